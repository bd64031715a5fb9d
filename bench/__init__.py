"""``make bench``: espbridge measured against the limits of this machine, measured in the same run.

Run ``python -m bench --help`` (``make bench`` sources the servers' settings first). Everything the
bench creates — a ``bench_*`` database, topics under a ``bench*.`` prefix, an ESP account folder
on the SFTP site, local files — is removed at the end, also when a run fails.
"""
