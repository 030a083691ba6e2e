"""Projectionist: shared pieces of the proxy and the control plane (config, store, rules, CLI)."""
