"""A HashiCorp Vault provider for the Kubernetes Secrets Store CSI driver."""

__version__ = "0.1.0"
