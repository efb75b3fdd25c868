# BUILD-file macros (loaded by [GLOBAL].build_file_prelude_globs in pants.toml).


def engine_pex(name, resolve, dependencies=(), **kwargs):
    """One engine resolve's two PEX files: the engine itself (`name`) and its doctor (`doctor` plus the
    part of `name` after "engine", e.g. engine-gpu -> doctor-gpu).

    The engine PEX has no entry point: Ray starts it as an interpreter (runtime_env py_executable). It
    holds every engine module of the resolve (`src/engine:lib`), all of `src/shared` (the driver creates
    actors of shared.engine_host.EngineHost, which nothing on the engine side imports, and the engine must
    never fall back to the driver's copy) and the whole resolve. Packed layout (one zip per wheel: the
    wheels total several GB and CPython cannot import a zipapp over 2 GB; an update that changes only
    project code re-ships only the code zip) and venv mode, so that workers start from a prepared venv.
    The complete platform (Linux x86_64, CPython 3.12, glibc >= 2.35) fits TPU VMs and GPU hosts.
    """
    pex_binary(
        name=name,
        resolve=resolve,
        dependencies=[
            f"src/engine:lib@resolve={resolve}",
            f"src/shared:shared@resolve={resolve}",
            # Users' own tasks (--task tasks.MODULE:CLASS): the engines score with them.
            f"src/tasks:tasks@resolve={resolve}",
            f"3rdparty/python:{resolve}",
            *dependencies,
        ],
        complete_platforms=["3rdparty/platforms:tpu-vm"],
        execution_mode="venv",
        layout="packed",
        include_tools=True,
        **kwargs,
    )
    pex_binary(
        name="doctor" + name[len("engine") :],
        entry_point="engine.doctor:main",
        resolve=resolve,
        dependencies=[f"src/engine/doctor.py:lib@resolve={resolve}", f"3rdparty/python:{resolve}"],
        execution_mode="venv",
        layout="packed",
    )
