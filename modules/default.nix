# Every Kiln role's module. Each is inert until `services.kiln.<role>.enable`.
{
  imports = [
    ./gateway.nix
    ./scheduler.nix
    ./agent.nix
    ./control-plane.nix
  ];
}
