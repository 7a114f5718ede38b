"""The human-feedback web app: annotators rank, rate, flag and rewrite model completions; admins run projects,
watch agreement and export rankings, consensus pairs and SFT data that the trainers read as is.

Entry points: `rlhfkit.feedback.app.create_app` and the `rlhfkit feedback` commands (rlhfkit.feedback.cli)."""
