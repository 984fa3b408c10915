"""YAML configs shipped with medvlm3d (package data): run configs, accelerate/ and deepspeed/."""
