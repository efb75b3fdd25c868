# The project's pins (../3rdparty/pins.json) as Nix values, with the nixpkgs attribute names they select.
let
  pins = builtins.fromJSON (builtins.readFile ../3rdparty/pins.json);
  attr = version: "python" + builtins.replaceStrings [ "." ] [ "" ] version;
in
pins // {
  pythonAttr = attr pins.python;
  pantsPythonAttr = attr pins.pants_python;
  # Where `nix profile install --profile` puts the TPU VM interpreter (see flake.nix, packages.tpu-vm).
  vmProfile = builtins.dirOf (builtins.dirOf pins.vm_python);
}
