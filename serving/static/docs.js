// Swagger UI on the service's OpenAPI document (BentoML's /docs.json). validatorUrl null: the UI would
// otherwise load a badge from validator.swagger.io.
"use strict";
window.ui = SwaggerUIBundle({
  url: "docs.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  plugins: [SwaggerUIBundle.plugins.DownloadUrl],
  layout: "StandaloneLayout",
});
