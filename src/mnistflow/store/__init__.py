"""The tracking store, before any run: what a URI names, whether the store can be used now,
what its errors mean, and its experiments.

- uris.py: kinds of store URI (server, SQLite file, the local spool's place), redacting secrets
- remote.py: one sentence for a server's 401/403/5xx or no answer, or an unwritable SQLite store
- checks.py: reachable, answering as MLflow, writable; a SQLite store made whole
- experiments.py: experiments made beside their store, marked as model training for the UI

Imports only config (and MLflow). The spool, tracking and everything above import this;
it never imports them: the spool's folder is named here (uris.spool_dir) for that reason.
"""
