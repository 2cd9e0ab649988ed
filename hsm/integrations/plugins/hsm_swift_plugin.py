"""ms-swift plugin file: ``swift sft ... --external_plugins $(python -m hsm.integrations.swift)``.

It lives in a folder of its own because ms-swift puts the plugin's folder first on ``sys.path``.
The hsm config comes from the ``HSM_CONFIG`` environment variable (a YAML with ``custom.hard_sample_mining``).
"""

from hsm.integrations.swift import register

register()
