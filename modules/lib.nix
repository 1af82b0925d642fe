# Helpers shared by the Kiln NixOS modules.
{ lib, pkgs }:
let
  format = pkgs.formats.toml { };
in
{
  inherit format;

  # One table of a service's TOML file (RFC 42): the typed options below
  # plus any other key, passed through as it is, so keys a newer Kiln reads
  # need no change to the module.
  section =
    options:
    lib.types.submodule {
      freeformType = format.type;
      inherit options;
    };

  # An option whose default comes from `modules/defaults/<role>.json` (the
  # file a Rust test renders through the service's own config type).
  setting =
    type: default: description:
    lib.mkOption { inherit type default description; };

  # A setting with no default: the operator must give it.
  required =
    type: description:
    lib.mkOption { inherit type description; };

  # An optional setting, left out of the file when null (TOML has no null).
  optional =
    type: description:
    lib.mkOption {
      type = lib.types.nullOr type;
      default = null;
      inherit description;
    };

  # Render settings: drop nulls, then replace the TLS file paths by the
  # copies systemd hands the service as credentials (`LoadCredential=`), so
  # keys can stay root-only (0600) while the service runs unprivileged.
  # Returns the TOML file and the `LoadCredential=` lines.
  render =
    {
      name,
      settings,
      secretPaths,
    }:
    let
      clean = lib.filterAttrsRecursive (_: v: v != null) settings;
      credDir = "/run/credentials/${name}.service";
      present = lib.filter (p: lib.hasAttrByPath p clean) secretPaths;
      credName = lib.concatStringsSep "-";
      rewritten = lib.foldl' (
        acc: p: lib.recursiveUpdate acc (lib.setAttrByPath p "${credDir}/${credName p}")
      ) clean present;
    in
    {
      file = format.generate "${name}.toml" rewritten;
      loadCredential = map (p: "${credName p}:${lib.getAttrFromPath p clean}") present;
    };

  # The port of a "host:port" or "[v6]:port" listen address.
  portOf = listen: lib.toInt (lib.last (lib.splitString ":" listen));

  # systemd sandboxing for a service that needs no privilege at all: a
  # dynamic user, a read-only system, no devices, no kernel access, only IP
  # and unix sockets, no namespaces, a system-call allow-list.
  unprivilegedHardening = {
    DynamicUser = true;
    CapabilityBoundingSet = [ "" ];
    AmbientCapabilities = [ "" ];
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectHostname = true;
    ProtectClock = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
      "~@resources"
    ];
    SystemCallErrorNumber = "EPERM";
    UMask = "0077";
    LimitNOFILE = 1048576;
    Restart = "on-failure";
    RestartSec = "2s";
  };
}
