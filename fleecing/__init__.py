"""Fleecing storages: where copy-before-write keeps old data during a live backup."""
