"""Kubeflow pipelines of diffugts (compiled by `make compile`, run locally by `make run`)."""
