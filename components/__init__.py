"""Kubeflow components: thin adapters that parse artifacts, call the library, write artifacts."""
