#!/usr/bin/env bash
# kiln-pki: the cluster CA and the certificates Kiln's services present,
# made with openssl in the layout `kiln dev` uses (crates/kiln-pki DevPki):
# DIR/ca.pem, DIR/ca-key.pem and DIR/<role>.pem, DIR/<role>-key.pem.
#
#   kiln-pki ca DIR                          create the CA (once; kept if present)
#   kiln-pki issue DIR gateway-internal NAME...  the gateway's internal listener
#                                            and client (identity: gateway)
#   kiln-pki issue DIR scheduler NAME...     the scheduler (identity: scheduler)
#   kiln-pki issue DIR agent NODE-ID NAME... the agent of compute node NODE-ID
#                                            (identity: agent/NODE-ID)
#   kiln-pki issue DIR operator              a client-only certificate for
#                                            `kiln nodes`/`kiln limits`
#                                            (identity: operator)
#   kiln-pki issue-public DIR ROLE NAME...   a server-only certificate (the
#                                            gateway's public listener; no
#                                            cluster identity)
#
# Every internal certificate names its holder's identity as one URI SAN,
# spiffe://<trust domain>/<role>[/<node-id>] (docs/security.md): the services
# authorise each internal call by it. The trust domain is $KILN_TRUST_DOMAIN
# (default "kiln"). gateway-internal, scheduler and agent certificates are
# valid as server and client (they serve and call); the operator's only as a
# client. NAMEs are DNS names or IP addresses.
#
# Keys are EC P-256 (PKCS#8), mode 0600; certificates are valid two years,
# the CA ten, like the ones `kiln dev` makes.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: kiln-pki ca DIR
       kiln-pki issue DIR gateway-internal NAME...
       kiln-pki issue DIR scheduler NAME...
       kiln-pki issue DIR agent NODE-ID NAME...
       kiln-pki issue DIR operator
       kiln-pki issue-public DIR ROLE NAME...  (server only: the public gateway)
USAGE
  exit 2
}

trust_domain=${KILN_TRUST_DOMAIN:-kiln}
if [[ ! "$trust_domain" =~ ^[a-z0-9._-]{1,255}$ ]]; then
  echo "kiln-pki: KILN_TRUST_DOMAIN must be lower-case letters, digits, '.', '-' or '_'" >&2
  exit 2
fi

[ $# -ge 2 ] || usage
cmd=$1
dir=$2
shift 2
mkdir -p "$dir"
umask 077

case "$cmd" in
ca)
  if [ -f "$dir/ca.pem" ] && [ -f "$dir/ca-key.pem" ]; then
    echo "kiln-pki: keeping the CA in $dir"
    exit 0
  fi
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca-key.pem"
  openssl req -x509 -new -key "$dir/ca-key.pem" -sha256 -days 3650 \
    -subj "/O=Kiln/CN=Kiln cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$dir/ca.pem"
  chmod 0644 "$dir/ca.pem"
  echo "kiln-pki: CA written to $dir/ca.pem"
  ;;
issue | issue-public)
  [ $# -ge 1 ] || usage
  role=$1
  shift
  case "$role" in
  *[!a-z0-9-]* | "") echo "kiln-pki: role must be lower-case letters, digits and '-'" >&2; exit 2 ;;
  esac
  identity=""
  usage_ext="serverAuth"
  if [ "$cmd" = issue ]; then
    usage_ext="serverAuth,clientAuth"
    case "$role" in
    gateway-internal) identity="gateway" ;;
    scheduler) identity="scheduler" ;;
    agent)
      [ $# -ge 1 ] || { echo "kiln-pki: an agent certificate names its node: kiln-pki issue DIR agent NODE-ID NAME..." >&2; exit 2; }
      node=$1
      shift
      if [[ ! "$node" =~ ^[a-z0-9_-]{1,64}$ ]]; then
        echo "kiln-pki: the node id must be 1 to 64 lower-case letters, digits, '-' or '_'" >&2
        exit 2
      fi
      identity="agent/$node"
      ;;
    operator)
      [ $# -eq 0 ] || { echo "kiln-pki: the operator certificate is client-only and names no host" >&2; exit 2; }
      identity="operator"
      usage_ext="clientAuth"
      ;;
    *)
      echo "kiln-pki: internal roles are gateway-internal, scheduler, agent and operator (issue-public for the public listener)" >&2
      exit 2
      ;;
    esac
  fi
  [ $# -ge 1 ] || [ "$role" = operator ] || usage
  if [ ! -f "$dir/ca.pem" ] || [ ! -f "$dir/ca-key.pem" ]; then
    echo "kiln-pki: no CA in $dir (run: kiln-pki ca $dir)" >&2
    exit 1
  fi
  sans=""
  if [ -n "$identity" ]; then
    sans=",URI:spiffe://$trust_domain/$identity"
  fi
  for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
      sans="$sans,IP:$name"
    else
      sans="$sans,DNS:$name"
    fi
  done
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cat >"$work/ext.cnf" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$usage_ext
subjectAltName=${sans#,}
EXT
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/key.pem"
  openssl req -new -key "$work/key.pem" -subj "/O=Kiln/CN=kiln-$role" -out "$work/req.csr"
  openssl x509 -req -in "$work/req.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
    -set_serial "0x$(openssl rand -hex 16)" -days 730 -sha256 \
    -extfile "$work/ext.cnf" -out "$work/cert.pem" 2>/dev/null
  install -m 0600 "$work/key.pem" "$dir/$role-key.pem"
  install -m 0644 "$work/cert.pem" "$dir/$role.pem"
  echo "kiln-pki: $dir/$role.pem for ${sans#,}"
  ;;
*) usage ;;
esac
