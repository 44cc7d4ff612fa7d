"""The dump directory: archive names, sidecar files, listing, protection, notes and prune."""
