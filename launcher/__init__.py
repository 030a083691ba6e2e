"""The launcher: the `projectionist` command, which starts the proxy (proxy_addons/), the control
plane (control/) and the dashboard. It stands above all three; `projectionist/` is the floor
they share and imports none of them."""
