"""Run by AUTOMATIC1111 / Forge when the extension is installed or the WebUI starts (a subprocess with the
WebUI on PYTHONPATH). Installs only what is missing; never torch or gradio, which belong to the WebUI."""

import launch  # type: ignore[import-not-found]  # the WebUI's own module

NEEDED = {"safetensors": "safetensors>=0.4.2", "numpy": "numpy>=1.26"}

for module, spec in NEEDED.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {spec}", f"{spec} for sd-webui-ziplora")
