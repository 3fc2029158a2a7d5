#!/usr/bin/env bash
# Everything the examples need on the Vault side (and the app's namespace and service
# account), as commands. Run with the vault or bao CLI logged in as an admin:
#
#   VAULT_ADDR=https://vault.example:8200 VAULT_TOKEN=... ./vault-setup.sh
#
# Optional:
#   VAULT=bao                       the CLI to use (vault by default)
#   DB_CONNECTION_URL, DB_USERNAME, DB_PASSWORD
#                                   a PostgreSQL for the database example, e.g.
#                                   postgresql://{{username}}:{{password}}@db.example:5432/app
#                                   (the database engine is skipped without it)
#   K8S_HOST, K8S_CA_FILE, REVIEWER_JWT
#                                   Vault OUTSIDE the cluster: the API server's URL and CA, and
#                                   a token of a service account allowed to create TokenReviews
#                                   (kubectl create token vault-reviewer -n kube-system, bound to
#                                   the system:auth-delegator ClusterRole). Inside the cluster
#                                   Vault finds the API server and its CA itself.
#   SKIP_KUBERNETES=1               do not create the app's namespace and service account
set -euo pipefail
VAULT=${VAULT:-vault}

# The listing is read whole before grep: `list | grep -q` under pipefail fails at random when
# grep exits at its first match and the CLI dies of SIGPIPE while still writing.
mounted() {
  local listing
  listing=$($VAULT "$1" list -format=json)
  grep -q "\"$2/\"" <<<"$listing"
}

# --- Kubernetes auth: Vault reviews each pod's token with the TokenReview API. ---------
mounted auth kubernetes || $VAULT auth enable kubernetes
if [ -n "${K8S_HOST:-}" ]; then
  $VAULT write auth/kubernetes/config \
    kubernetes_host="$K8S_HOST" \
    kubernetes_ca_cert=@"$K8S_CA_FILE" \
    token_reviewer_jwt="$REVIEWER_JWT" \
    disable_local_ca_jwt=true
else
  $VAULT write auth/kubernetes/config kubernetes_host="https://kubernetes.default.svc:443"
fi

# --- KV v2 at secret/, with the data the examples read. ------------------------------
mounted secrets secret || $VAULT secrets enable -path=secret -version=2 kv
$VAULT kv put secret/app/db password=example-db-password
$VAULT kv put secret/app/config log_level=info feature_flags=beta
$VAULT kv put secret/app/sync1 pwd=example-sync-password
$VAULT kv put secret/app/sync2 username=app-user username_b64="$(printf 'app-user' | base64)"
# A nested value (spc-env.yaml reads /postgres/host with secretKeyPath).
$VAULT kv put secret/app/service - <<'JSON'
{"postgres": {"host": "db.example.com", "port": 5432}}
JSON

# --- PKI at pki/: a root CA and a role "app" for *.example.com. ----------------------
if ! mounted secrets pki; then
  $VAULT secrets enable pki
  $VAULT secrets tune -max-lease-ttl=87600h pki
  $VAULT write -field=certificate pki/root/generate/internal common_name=example-ca ttl=87600h >/dev/null
fi
$VAULT write pki/roles/app allowed_domains=example.com allow_subdomains=true max_ttl=72h

# --- Database at database/: a role "app" minting PostgreSQL users (1 h, renewable). ---
if [ -n "${DB_CONNECTION_URL:-}" ]; then
  mounted secrets database || $VAULT secrets enable database
  $VAULT write database/config/app \
    plugin_name=postgresql-database-plugin \
    connection_url="$DB_CONNECTION_URL" \
    username="$DB_USERNAME" password="$DB_PASSWORD" \
    allowed_roles=app
  $VAULT write database/roles/app \
    db_name=app \
    creation_statements="CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';" \
    default_ttl=1h max_ttl=24h
fi

# --- What the app may read, and the role the SecretProviderClasses name. -------------
# sys/leases/renew lets the provider renew the app's database lease (same user, no churn).
$VAULT policy write app - <<'POLICY'
path "secret/data/app/*"   { capabilities = ["read"] }
path "database/creds/app"  { capabilities = ["read"] }
path "pki/issue/app"       { capabilities = ["update"] }
path "pki/ca_chain"        { capabilities = ["read"] }
path "sys/leases/renew"    { capabilities = ["update"] }
POLICY
# audience must match the driver's tokenRequests audience (driver-values.yaml).
$VAULT write auth/kubernetes/role/app \
  bound_service_account_names=app \
  bound_service_account_namespaces=app \
  audience=vault \
  token_policies=app \
  token_ttl=1h

# --- The app's namespace and service account (the examples' pods run as app/app). ----
if [ "${SKIP_KUBERNETES:-}" != 1 ]; then
  kubectl create namespace app --dry-run=client -o yaml | kubectl apply -f -
  kubectl create serviceaccount app -n app --dry-run=client -o yaml | kubectl apply -f -
fi
