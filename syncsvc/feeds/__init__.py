"""Per-user iCal feeds: rendering many activities into one subscribable calendar."""
