"""Change detection: noticing what users change in their own calendars, for every provider.

* :mod:`.source`: the skeleton each provider fills in (read changes since a token, with a full
  read when the token has expired; open, renew and close a subscription) and the two jobs built
  on it, ``sync`` and ``check_subscriptions``;
* :mod:`.graph` (subscriptions + delta), :mod:`.google` (channels + sync tokens),
  :mod:`.caldav` (polls: ``sync-collection`` or ``getctag``): one module per source;
* :mod:`.apply`: what every source's changes do to activities (the assignee wins) and the
  signed callbacks to the CRM;
* :mod:`.schedule`: the loops that queue the periodic checks.

The webhooks (``webhooks/``) are thin edges that call ``graph.record_notifications`` and
``google.record_notification``; the provider HTTP calls stay in ``syncsvc.providers``.
"""
