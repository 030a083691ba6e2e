"""Entry point for a stock mitmdump:

    mitmdump -s proxy_addons/script.py --mode regular@8080 --set connection_strategy=lazy \
        --set projectionist_rules=rules.yaml --set projectionist_db=~/.config/projectionist/projectionist.db \
        --set projectionist_home=~/.config/projectionist
"""

from proxy_addons.runner import projectionist_addons

addons = projectionist_addons()
