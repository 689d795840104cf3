"""`mosaic web`: a local web view of the daemon and its studies (docs/web.md).

The web stack (Starlette, uvicorn) is an optional extra, imported only by `mosaic web`: nothing
outside this package imports it, so the other commands start as fast as before.

Modules: ``security`` (the access token, host and same-origin checks), ``studies`` (read-only
SQL on study databases, paged and sorted in SQLite), ``live`` (polls the daemon and pushes what
changed to the pages), ``pages`` (the HTML shells) and ``app`` (routes and the server).
"""
