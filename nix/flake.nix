{
  description = "hermetic-es: pinned interpreters and tools for development machines and TPU VMs";

  # nixpkgs is pinned by revision and hash in flake.lock (nixos-24.11: CPython 3.9 and 3.12).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      pins = import ./pins.nix;
      python = pkgs.${pins.pythonAttr};
      pantsPython = pkgs.${pins.pantsPythonAttr};
      tools = with pkgs; [ bash coreutils findutils gnugrep gnused gnutar gzip git openssh rsync util-linux which ];
    in
    {
      # `nix develop ./nix`: CPython 3.9 runs Pants 2.17.1, CPython 3.12 is what the PEX files target, and
      # Pants's local_environment searches only the Nix interpreter (HERMETIC_ES_PYTHON_SEARCH_PATH).
      devShells.${system}.default = pkgs.mkShell {
        packages = [ python pantsPython ] ++ tools;
        shellHook = ''
          export HERMETIC_ES_PANTS_PYTHON=${pantsPython}/bin/python${pins.pants_python}
          export HERMETIC_ES_PYTHON_SEARCH_PATH=${python}/bin
          export HERMETIC_ES_ENGINE_PYTHON=${python}/bin/python${pins.python}
        '';
      };

      # On a TPU VM: `nix profile install --profile ${pins.vmProfile} ./nix#tpu-vm` gives exactly the
      # CPython the bundle manifest names (vm_python), plus the tools the ship installer uses.
      packages.${system} = {
        tpu-vm = pkgs.buildEnv {
          name = "hermetic-es-tpu-vm";
          paths = [ python pkgs.rsync pkgs.openssh ];
        };
        default = self.packages.${system}.tpu-vm;
      };
    };
}
