"""syncsvc: plan mass-created CRM activities and keep them in users' calendars."""
