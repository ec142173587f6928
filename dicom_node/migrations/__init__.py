"""Alembic environment and revisions of the index and job table (shipped in the package).

:func:`dicom_node.db.migrate` runs them at start-up; ``alembic`` is never needed on the command
line. To add a revision, write ``versions/NNNN_what.py`` by hand (``down_revision`` = the
previous head), mirror the change in :mod:`dicom_node.models`, and add an upgrade test.
"""
