"""The federation runtime: institutions, the coordinator, the in-process simulation and the run folder.

Protocol pieces here do no I/O of their own beyond an institution's private files; the in-process simulation
(:mod:`.simulation`) and the Flower transport drive the same :class:`Institution` and :class:`Coordinator`.
"""
