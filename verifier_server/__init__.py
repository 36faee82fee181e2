"""The verifier server: holds the target model and verifies drafts from many devices in shared
forward passes."""
