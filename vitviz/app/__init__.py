"""The vitviz web app (Streamlit): the only part of vitviz that imports streamlit.

Layout: ``main.py`` draws the page (sidebar groups, then a section control, the open section's controls and its
views as tabs); ``sidebar.py`` has one function per sidebar group and ``controls.py`` one per section, each returning
a frozen dataclass of the choices; ``state.py`` the session keys and their initialisation; ``cache.py`` the
``st.cache_*`` wrappers; ``context.py`` what a view is given; ``widgets.py`` the shared chart/click helpers and the
error guard; ``views/`` one module per view with a ``TITLE`` and a ``render(ctx)``, listed by section in
``views.SECTIONS``. Adding a view is one new module plus its name in one section of that list.
"""
