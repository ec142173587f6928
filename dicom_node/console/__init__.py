"""The admin console: web pages, a REST API, Prometheus metrics and health checks over HTTP.

``dicom-node serve`` runs it in its own process when the config has an ``http`` section
(:mod:`.server`). Everything HTTP lives in this package; the rest of the node does not import it.

- :mod:`.app`: the application (routers, static files, security headers);
- :mod:`.auth` (passwords, sessions, login rate limits) and :mod:`.guard` (who is asking);
- :mod:`.api` (REST, JSON), :mod:`.web` and :mod:`.configpages` (HTML pages, ``pages/``);
- :mod:`.configedit` (validated, atomic, comment-keeping edits of the YAML file) and
  :mod:`.forms` (forms drawn from the config's pydantic models);
- :mod:`.views` (what the pages and the API show, read from the index);
- :mod:`.prometheus` (``/metrics``), :mod:`.health` (``/healthz``, ``/readyz``);
- :mod:`.changes`: the one function every change goes through (log and audit trail).
"""
