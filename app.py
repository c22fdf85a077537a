"""vitviz app: how a timm Vision Transformer reads an image.

Run with ``streamlit run app.py`` (or ``vitviz app`` from an installed package). The page lives in
:mod:`vitviz.app.main`; this file is only the entry point Streamlit runs.
"""

from vitviz.app.main import main

main()
