"""File restore from VMA archives inside a throw-away helper VM.

The guest's file systems are parsed by the helper VM's kernel, never by the host's: a backup
may hold a hostile file system. The archive's devices reach the helper read-only through our
NBD export; a service of ours in the helper answers list and extract requests over a
virtio-serial port. ``guest_service`` and ``wire`` run inside the helper and use only the
standard library; everything else runs on the host.
"""
