from jinja2 import Template

PAGE = Template("<h1>Hello, {{ name }}!</h1><p>Greeting {{ count }} of this instance.</p>")
GREETED = {"count": 0}


def handle(event, context):
    GREETED["count"] += 1
    name = event.get("name", "world")
    context.logger.info("greeting %s (%s, %d ms left)", name, context.invocation_id, context.remaining_ms())
    return {"html": PAGE.render(name=name, count=GREETED["count"]), "cold_start": context.cold_start}
