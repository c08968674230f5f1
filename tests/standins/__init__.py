"""Stand-ins for the WebUI modules the host adapters import (``modules.*``, the Lora extension's ``networks``).

Each reproduces only the surface an adapter uses, on the toy model, and cites the WebUI file and function it
mirrors; tests install them into ``sys.modules`` for one test and remove them afterwards.
"""
