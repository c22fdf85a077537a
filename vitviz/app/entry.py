"""The script Streamlit runs for ``vitviz app`` (the checkout's ``app.py`` does the same)."""

from vitviz.app.main import main

main()
