"""The rig the benchmark and the chaos scenarios (``tests/chaos``) share: a run's worker
replicas and vendor sandbox as processes, the replicas' settings, its broker names, and
the result events it receives.

``procs`` child processes · ``sandbox`` the sandbox process · ``tenants`` its accounts as
``RELAY_TENANTS`` · ``names`` a run's broker names · ``replicas`` the replicas' settings
and processes · ``events`` the result-event collector. The processes themselves are
``bench/sandbox_proc.py`` and ``bench/relay_worker.py``.
"""
