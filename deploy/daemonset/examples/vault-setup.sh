#!/usr/bin/env bash
# The Vault side of the examples, as commands (vault or bao CLI, logged in as an admin).
set -euo pipefail
VAULT=${VAULT:-vault}

# Kubernetes auth: Vault reviews the pod's token with the TokenReview API. Inside the
# cluster Vault finds the API server and its CA itself.
$VAULT auth enable kubernetes || true
$VAULT write auth/kubernetes/config kubernetes_host="https://kubernetes.default.svc:443"

# What the app may read.
$VAULT policy write app - <<'POLICY'
path "secret/data/app/*"   { capabilities = ["read"] }
path "database/creds/app"  { capabilities = ["read"] }
path "pki/issue/app"       { capabilities = ["update"] }
POLICY

# The role the SecretProviderClass names: service account app in namespace app.
# audience must match the driver's tokenRequests audience (driver-values.yaml).
$VAULT write auth/kubernetes/role/app \
  bound_service_account_names=app \
  bound_service_account_namespaces=app \
  audience=vault \
  token_policies=app \
  token_ttl=1h
