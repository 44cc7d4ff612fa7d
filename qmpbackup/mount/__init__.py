"""Archives on the host: ``qmpbackup export`` (an NBD server of an archive's devices) and
``qmpbackup mount``/``umount`` (a device's file system mounted read-only, without /dev/nbd*)."""
