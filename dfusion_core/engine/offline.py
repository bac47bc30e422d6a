"""No telemetry: set before diffusers / transformers / gradio are imported, for the CLI, app and tests alike.

Nothing here stops downloads: `load_model("stabilityai/...")` fetches a hub id that is not cached, as diffusers
does. Machines without a network (tests, CI, the embedded model's demos) set HF_HUB_OFFLINE=1 themselves; then a
hub id that is not in the local cache is refused with one message (engine.loading.load_model).
"""
import os

for _name, _value in {"HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                      "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_name, _value)
