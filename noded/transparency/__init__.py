"""What the node shows the world: probes and real-time mirror state, traffic statistics and off-peak
advice, community reports and the re-verification they ask for, `locate` (where else a dataset lives),
and the Prometheus metrics.

Pure policy (no I/O): `offpeak` (load profile, quiet hours, the timetable slot in force), `locate`
(ranking of mirrors), `mirror_state` (a mirror's state from its probe history).
"""
