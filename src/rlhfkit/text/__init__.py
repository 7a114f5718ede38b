"""Text tools shared by evaluation, retrieval and rewards: normalisation and fact checking (`facts`)."""
