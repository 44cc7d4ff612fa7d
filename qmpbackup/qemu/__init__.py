"""The QEMU control plane: QMP sessions, capability probe, drive discovery, spawned QEMU.

Everything that talks to a QEMU process lives here; nothing here knows about VMA,
NBD servers or archives. Modules:

* :mod:`.session`      -- one QMP connection with timeouts, typed errors, event waits
* :mod:`.schema`       -- walks ``query-qmp-schema``'s type graph
* :mod:`.capabilities` -- the one typed answer to "what can this QEMU do"
* :mod:`.discovery`    -- which disks a running VM has, under their Proxmox keys
* :mod:`.naming`       -- every node/job/export/bitmap name we create in QEMU
* :mod:`.spawn`        -- a paused QEMU for a stopped VM, never left behind
* :mod:`.errors`       -- the exceptions of this package
"""
