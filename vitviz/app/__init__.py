"""The vitviz web app (Streamlit): the only part of vitviz that imports streamlit.

Layout: ``main.py`` draws the page (sidebar groups, then one tab per registered view); ``sidebar.py`` has one function
per sidebar group, each returning a frozen dataclass of the choices; ``state.py`` the session keys and their
initialisation; ``cache.py`` the ``st.cache_*`` wrappers; ``context.py`` what a view is given; ``widgets.py`` the
shared chart/click helpers; ``views/`` one module per tab with a ``render(ctx)``, registered in ``views.VIEWS``.
Adding a view is one new module plus one line in that list.
"""
