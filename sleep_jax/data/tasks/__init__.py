"""Generated tasks: fictional worlds with closed-book questions."""
