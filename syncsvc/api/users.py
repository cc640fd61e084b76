"""``/v1/users``: CRM users with their zone, country, days off and calendar connection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.api._framework import Ctx, Routes
from syncsvc.api.connections import PROVIDERS
from syncsvc.api.pagination import ExportQuery, Page, csv_response, decode_cursor, page
from syncsvc.api.plan_schemas import single_line
from syncsvc.service import users as service
from syncsvc.service.users import check_http_url
from syncsvc.store.models import User

routes = Routes(tag="users")

USER_ID_MAX_CHARS = 200
TEXT_MAX_CHARS = 200
EMAIL_MAX_CHARS = 320
MOBILE_MAX_CHARS = 64
ADDRESS_MAX_CHARS = 2048
SECRET_MAX_CHARS = 4096
DAYS_OFF_MAX = 3660
CSV_COLUMNS = ("id", "name", "email", "mobile", "timezone", "country", "subdivision", "provider")


class UserPath(BaseModel):
    user_id: str = Field(min_length=1, max_length=USER_ID_MAX_CHARS)


# --- Calendar connections: a union on ``provider``. ---


class GraphCalendar(BaseModel):
    """Microsoft 365: app-only access to this mailbox's default calendar."""

    provider: Literal["graph"]
    mailbox: Annotated[str, AfterValidator(single_line)] = Field(
        min_length=1, max_length=EMAIL_MAX_CHARS
    )


class GoogleOAuth(BaseModel):
    """The user's own OAuth grant, instead of the service account's delegation."""

    refresh_token: str = Field(min_length=1, max_length=SECRET_MAX_CHARS)
    client_id: str = Field(min_length=1, max_length=SECRET_MAX_CHARS)
    client_secret: str = Field(min_length=1, max_length=SECRET_MAX_CHARS)


class GoogleCalendar(BaseModel):
    provider: Literal["google"]
    calendar_id: Annotated[str, AfterValidator(single_line)] = Field(
        min_length=1, max_length=ADDRESS_MAX_CHARS
    )
    oauth: GoogleOAuth | None = None


class CaldavCalendar(BaseModel):
    """The calendar collection's ``url``, or the server's ``server_url`` to discover it from."""

    provider: Literal["caldav"]
    url: str | None = Field(
        default=None,
        min_length=1,
        max_length=ADDRESS_MAX_CHARS,
        description="The calendar collection URL, used as given.",
    )
    server_url: str | None = Field(
        default=None,
        min_length=1,
        max_length=ADDRESS_MAX_CHARS,
        description="The server's URL (e.g. https://caldav.example.com/): the calendar is "
        "discovered from it (RFC 6764 well-known URL, principal, calendar home) when the "
        "user is stored, and answered as url; a server where none is found is a 422.",
    )
    username: Annotated[str, AfterValidator(single_line)] = Field(max_length=EMAIL_MAX_CHARS)
    password: str = Field(max_length=SECRET_MAX_CHARS, description="Stored encrypted.")

    @field_validator("url", "server_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @model_validator(mode="after")
    def _one_address(self) -> CaldavCalendar:
        if (self.url is None) == (self.server_url is None):
            raise ValueError("give exactly one of url (the calendar) and server_url")
        return self


class NoCalendar(BaseModel):
    """No pushed calendar: the user subscribes to the iCal feed instead."""

    provider: Literal["none"]


Calendar = Annotated[
    GraphCalendar | GoogleCalendar | CaldavCalendar | NoCalendar, Field(discriminator="provider")
]


class UserIn(BaseModel):
    name: str = Field(default="", max_length=TEXT_MAX_CHARS)
    email: Annotated[str, AfterValidator(single_line)] = Field(
        default="", max_length=EMAIL_MAX_CHARS
    )
    mobile: str = Field(default="", max_length=MOBILE_MAX_CHARS)
    timezone: str = Field(
        description="IANA zone, e.g. Europe/Copenhagen.",
        max_length=64,
        json_schema_extra={"enum": list(service.timezones())},
    )
    country: str | None = Field(
        default=None,
        max_length=8,
        description="ISO 3166-1 alpha-2 (public holidays), e.g. DK.",
        json_schema_extra={"enum": [*service.countries(), None]},
    )
    subdivision: str | None = Field(
        default=None, max_length=16, description="The country's subdivision code, e.g. BY for DE."
    )
    days_off: list[date] = Field(default_factory=list, max_length=DAYS_OFF_MAX)
    calendar: Calendar

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return service.check_timezone(value)

    @field_validator("country")
    @classmethod
    def _country(cls, value: str | None) -> str | None:
        return None if value is None else service.check_country(value)

    @field_validator("subdivision")
    @classmethod
    def _subdivision(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if "country" not in info.data:
            return value  # the country is wrong already; that error is reported
        country = info.data["country"]
        if country is None:
            raise ValueError("a subdivision needs a country")
        return service.check_subdivision(country, value)


class GraphCalendarOut(BaseModel):
    provider: Literal["graph"]
    mailbox: str


class GoogleCalendarOut(BaseModel):
    provider: Literal["google"]
    calendar_id: str
    oauth_configured: bool


class CaldavCalendarOut(BaseModel):
    provider: Literal["caldav"]
    url: str = Field(description="The calendar collection, as given or as discovered.")
    server_url: str | None = Field(default=None, description="The server URL discovered from.")
    username: str
    password_set: bool


class NoCalendarOut(BaseModel):
    provider: Literal["none"]


CalendarOut = Annotated[
    GraphCalendarOut | GoogleCalendarOut | CaldavCalendarOut | NoCalendarOut,
    Field(discriminator="provider"),
]


class UserConnectionOut(BaseModel):
    """The grant of a user who connected their own calendar (``POST /v1/users/{id}/connect``)."""

    state: Literal["connected", "reconnect_needed"] = Field(
        description="`reconnect_needed`: the provider no longer takes the user's grant; their "
        "operations wait until they connect again."
    )
    error: str | None = Field(description="What the provider said, when reconnect_needed.")


class UserOut(BaseModel):
    """A user as stored, without secrets."""

    id: str
    name: str
    email: str
    mobile: str
    timezone: str
    country: str | None
    subdivision: str | None
    days_off: list[date]
    calendar: CalendarOut
    connection: UserConnectionOut | None = Field(
        description="Set when the user signed in to their calendar themselves."
    )
    created_at: datetime
    updated_at: datetime


class DaysOffQuery(BaseModel):
    start: date | None = Field(
        default=None, alias="from", description="First day; default today in the user's zone."
    )
    end: date | None = Field(
        default=None,
        alias="to",
        description=f"Last day (inclusive); default {service.DAYS_OFF_DEFAULT_WINDOW_DAYS} "
        f"days after from, at most {service.DAYS_OFF_MAX_WINDOW_DAYS}.",
    )


class DayOffOut(BaseModel):
    day: date = Field(serialization_alias="date")
    source: str = Field(description="crm | holiday | graph | google | caldav")
    name: str = Field(description="The holiday's name; empty for other sources.")


class DaysOffOut(BaseModel):
    start: date = Field(serialization_alias="from")
    end: date = Field(serialization_alias="to")
    items: list[DayOffOut]
    next_cursor: None = None


def _calendar_out(
    user: User,
) -> GraphCalendarOut | GoogleCalendarOut | CaldavCalendarOut | NoCalendarOut:
    config: dict[str, Any] = user.calendar_config
    has_secret = user.calendar_secret is not None
    match user.calendar_provider:
        case "graph":
            return GraphCalendarOut(provider="graph", mailbox=str(config.get("mailbox", "")))
        case "google":
            return GoogleCalendarOut(
                provider="google",
                calendar_id=str(config.get("calendar_id", "")),
                oauth_configured=has_secret,
            )
        case "caldav":
            return CaldavCalendarOut(
                provider="caldav",
                url=str(config.get("url", "")),
                server_url=config.get("server_url"),
                username=str(config.get("username", "")),
                password_set=has_secret,
            )
        case _:
            return NoCalendarOut(provider="none")


def user_out(user: User) -> UserOut:
    return UserOut(
        id=user.id,
        name=user.name,
        email=user.email,
        mobile=user.mobile,
        timezone=user.timezone,
        country=user.country,
        subdivision=user.subdivision,
        days_off=[date.fromisoformat(str(d)) for d in user.days_off],
        calendar=_calendar_out(user),
        connection=(
            UserConnectionOut(
                state="reconnect_needed"
                if user.connection_state == "reconnect_needed"
                else "connected",
                error=user.connection_error,
            )
            if user.connection_state
            else None
        ),
        created_at=user.created_at,
        updated_at=user.updated_at,
    )


@routes.endpoint(
    "PUT",
    "/v1/users/{user_id}",
    path=UserPath,
    body=UserIn,
    response=UserOut,
    summary="Create or replace a user",
)
async def put_user(ctx: Ctx, path: UserPath, body: UserIn) -> UserOut:
    """Replaces every field; the calendar's secrets are stored encrypted and never returned."""
    async with ctx.session() as session:
        calendar = await service.resolve_calendar(
            session,
            ctx.box,
            ctx.tenant_id,
            path.user_id,
            body.calendar.model_dump(mode="json"),
            ctx.request.app[PROVIDERS].discover_caldav,
        )
    spec = service.UserSpec(
        name=body.name,
        email=body.email,
        mobile=body.mobile,
        timezone=body.timezone,
        country=body.country,
        subdivision=body.subdivision,
        days_off=body.days_off,
        calendar=calendar,
    )
    async with ctx.session() as session, session.begin():
        user, _ = await service.put_user(session, ctx.box, ctx.tenant_id, path.user_id, spec)
        return user_out(user)


@routes.endpoint(
    "GET", "/v1/users/{user_id}", path=UserPath, response=UserOut, summary="A user, no secrets"
)
async def get_user(ctx: Ctx, path: UserPath) -> UserOut:
    async with ctx.session() as session:
        return user_out(await service.get_user(session, ctx.tenant_id, path.user_id))


@routes.endpoint(
    "GET",
    "/v1/users",
    query=ExportQuery,
    response=Page[UserOut],
    media_type="text/csv",
    summary="The tenant's users by id, paginated (or ?format=csv)",
)
async def list_users(ctx: Ctx, query: ExportQuery) -> Page[UserOut] | web.StreamResponse:
    async with ctx.session() as session:
        if query.format == "csv":
            return await csv_response(
                ctx.request, CSV_COLUMNS, _csv_rows(session, ctx.tenant_id), "users.csv"
            )
        after = decode_cursor(query.cursor)
        rows = await service.list_users(
            session, ctx.tenant_id, str(after[0]) if after else None, query.limit + 1
        )
        return page(Page[UserOut], rows, query.limit, user_out, lambda u: [u.id])


async def _csv_rows(session: AsyncSession, tenant_id: str) -> AsyncIterator[Sequence[Any]]:
    async for u in service.iter_users(session, tenant_id):
        yield (
            u.id,
            u.name,
            u.email,
            u.mobile,
            u.timezone,
            u.country,
            u.subdivision,
            u.calendar_provider,
        )


@routes.endpoint(
    "GET",
    "/v1/users/{user_id}/days-off",
    path=UserPath,
    query=DaysOffQuery,
    response=DaysOffOut,
    summary="The user's days off from every source",
)
async def get_days_off(ctx: Ctx, path: UserPath, query: DaysOffQuery) -> DaysOffOut:
    """CRM days off, public holidays of the user's country/subdivision and days off read from
    the user's calendar, one entry per (date, source), by date."""
    async with ctx.session() as session:
        found = await service.days_off(
            session, ctx.tenant_id, path.user_id, query.start, query.end, datetime.now(UTC)
        )
    return DaysOffOut(
        start=found.start,
        end=found.end,
        items=[DayOffOut(day=d.day, source=d.source, name=d.name) for d in found.days],
    )
