"""Projectionist's mitmproxy addons: one small class per concern (see runner.projectionist_addons)."""
