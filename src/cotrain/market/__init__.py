"""Find compute across providers, launch it, and have it join a task (``cotrain market``).

``offers`` (the normalized ``Offer`` and how offers are filtered, merged and sorted),
``provider`` (the ``Provider`` interface every adapter implements), ``local`` (this machine).
"""
