"""The client side of the ``memvault`` command: each module is the logic of some commands,
thin over the SDK (``memvault.client``); ``memvault.cli`` only declares their arguments.

``config`` (login: where the server and token are kept), ``messages`` (errors as sentences a
person can act on), ``output`` (consoles, tables, JSON), ``library`` (capsules, listing,
downloads, sessions), ``upload`` (files and folders, with progress and resume).
"""
