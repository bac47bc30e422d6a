"""No network: set before diffusers / transformers / gradio are imported, for the CLI, app and tests alike.

Model loading from a hub id still works when the files are in the local cache; nothing is downloaded and
no telemetry is sent. A user who wants downloads sets the variables to 0 before starting.
"""
import os

for _name, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1",
                      "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_name, _value)
