"""Tiny Linux guests built from Debian packages (``apt-get download``), never from a foreign image.

Two guests are built this way: the test guest (``scripts/build-test-guest``) and the helper VM
of ``qmpbackup file-restore``. Both resolve their packages to the candidate versions of the
host's apt lists, extract only the files they need, add the shared libraries those files need
(read from the ELF headers, no tools of the guest's), and pack an initramfs. A build is cached
under a key made of the package versions and the recipe, so it is redone only when an input
changes.
"""
