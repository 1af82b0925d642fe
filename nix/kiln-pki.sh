#!/usr/bin/env bash
# kiln-pki: the cluster CA and the certificates Kiln's services present,
# made with openssl in the layout `kiln dev` uses (crates/kiln-pki DevPki):
# DIR/ca.pem, DIR/ca-key.pem and DIR/<role>.pem, DIR/<role>-key.pem.
#
#   kiln-pki ca DIR                        create the CA (once; kept if present)
#   kiln-pki issue DIR ROLE NAME...        a certificate for NAMEs (DNS names
#                                          or IP addresses) valid as server and
#                                          client: the internal mTLS identities
#                                          (gateway-internal, scheduler, agent)
#   kiln-pki issue-public DIR ROLE NAME... a server-only certificate (the
#                                          gateway's public listener)
#
# Keys are EC P-256 (PKCS#8), mode 0600; certificates are valid two years,
# the CA ten, like the ones `kiln dev` makes.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: kiln-pki ca DIR
       kiln-pki issue DIR ROLE NAME...         (server and client: internal mTLS)
       kiln-pki issue-public DIR ROLE NAME...  (server only: the public gateway)
USAGE
  exit 2
}

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
  [ $# -ge 2 ] || usage
  role=$1
  shift
  case "$role" in
  *[!a-z0-9-]* | "") echo "kiln-pki: role must be lower-case letters, digits and '-'" >&2; exit 2 ;;
  esac
  if [ ! -f "$dir/ca.pem" ] || [ ! -f "$dir/ca-key.pem" ]; then
    echo "kiln-pki: no CA in $dir (run: kiln-pki ca $dir)" >&2
    exit 1
  fi
  sans=""
  for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
      sans="$sans,IP:$name"
    else
      sans="$sans,DNS:$name"
    fi
  done
  if [ "$cmd" = issue ]; then usage_ext="serverAuth,clientAuth"; else usage_ext="serverAuth"; fi
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
