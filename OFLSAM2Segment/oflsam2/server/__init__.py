"""``oflsam2 serve``: the engine as an HTTP(S) server shared by Slicer and CLI clients.

Layout: :mod:`.command` (the CLI command), :mod:`.config` (listen address, token, limits),
:mod:`.auth` (token check before routing), :mod:`.app` (the ``/v1`` API), :mod:`.requests` (a
job request checked), :mod:`.sessions` (each client's uploads, jobs and engine state),
:mod:`.jobs` (event logs and the device queue), :mod:`.models` (the device's shared models).
The jobs themselves are the pipe worker's (:class:`oflsam2.engine_session.EngineSession`);
clients use :mod:`oflsam2.client`, which needs the standard library and numpy only.
"""
