"""From text to trained SAEs: data, harvesting, the activation cache and the trainer."""
