"""The explorer: a local web page over cached stores. `explorer.Explorer` answers what a click on a source
point shows, in plain data, from cache only; `server` serves it to the static page in `page/`."""
